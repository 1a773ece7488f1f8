// A plain Java 17 HttpsServer (JDK only) on the default SSLContext: the keystore and
// truststore come from the javax.net.ssl.* system properties, and the default PKIX trust
// manager checks each client's chain for revocation when the JVM is started with
// -Dcom.sun.net.ssl.checkRevocation=true (CRLs from the certificates' CRL Distribution
// Points with -Dcom.sun.security.enableCRLDP=true; OCSP with the "ocsp" argument).
// Usage: java [properties] JsseServer.java [ocsp]
// Prints "listening PORT"; answers {"caller": SPIFFE_ID, "serial": HEX} to each call.
import com.sun.net.httpserver.HttpsConfigurator;
import com.sun.net.httpserver.HttpsExchange;
import com.sun.net.httpserver.HttpsParameters;
import com.sun.net.httpserver.HttpsServer;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.security.Security;
import java.security.cert.X509Certificate;
import java.util.List;
import javax.net.ssl.SSLContext;

public class JsseServer {
    public static void main(String[] args) throws Exception {
        if (args.length > 0 && args[0].equals("ocsp")) {
            // a security property, not a system property: set it before the first handshake
            Security.setProperty("ocsp.enable", "true");
        }
        SSLContext context = SSLContext.getDefault();
        // a resumed session skips the revocation check: keep no session for long
        context.getServerSessionContext().setSessionTimeout(1);
        HttpsServer server = HttpsServer.create(new InetSocketAddress("127.0.0.1", 0), 64);
        server.setHttpsConfigurator(new HttpsConfigurator(context) {
            @Override public void configure(HttpsParameters params) {
                var ssl = getSSLContext().getDefaultSSLParameters();
                ssl.setNeedClientAuth(true); // no client certificate, no handshake
                params.setSSLParameters(ssl);
            }
        });
        server.createContext("/", exchange -> {
            var caller = (X509Certificate) ((HttpsExchange) exchange).getSSLSession().getPeerCertificates()[0];
            String id = "";
            try {
                for (List<?> name : caller.getSubjectAlternativeNames()) {
                    if ((Integer) name.get(0) == 6) id = (String) name.get(1); // the URI SAN
                }
            } catch (Exception e) { /* no SANs: no ID */ }
            byte[] body = ("{\"caller\": \"" + id + "\", \"serial\": \""
                    + caller.getSerialNumber().toString(16) + "\"}").getBytes(StandardCharsets.UTF_8);
            exchange.getResponseHeaders().set("content-type", "application/json");
            exchange.sendResponseHeaders(200, body.length);
            exchange.getResponseBody().write(body);
            exchange.close();
        });
        server.setExecutor(java.util.concurrent.Executors.newFixedThreadPool(4));
        server.start();
        System.out.println("listening " + server.getAddress().getPort());
    }
}
