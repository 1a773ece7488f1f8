// A plain Java 17 HttpClient (JDK only) on the default SSLContext: keystore and truststore
// from the javax.net.ssl.* system properties; with -Dcom.sun.net.ssl.checkRevocation=true
// the default PKIX trust manager checks the server's chain for revocation (CRLDP with
// -Dcom.sun.security.enableCRLDP=true; OCSP with the "ocsp" argument), host name included.
// Usage: java [properties] JsseClient.java [ocsp]
// Makes one GET per URL read from stdin, each on a new connection, and prints
// "STATUS BODY" or "ERROR EXCEPTION".
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.security.Security;
import javax.net.ssl.SSLContext;

public class JsseClient {
    public static void main(String[] args) throws Exception {
        if (args.length > 0 && args[0].equals("ocsp")) {
            Security.setProperty("ocsp.enable", "true"); // before the first handshake
        }
        SSLContext context = SSLContext.getDefault();
        context.getClientSessionContext().setSessionTimeout(1); // resumption skips the check
        BufferedReader stdin = new BufferedReader(new InputStreamReader(System.in));
        for (String url; (url = stdin.readLine()) != null; ) {
            // a new HttpClient per call: a new connection, the server's chain checked again
            HttpClient client = HttpClient.newBuilder().sslContext(context).build();
            HttpRequest request = HttpRequest.newBuilder(URI.create(url)).GET().build();
            try {
                HttpResponse<String> response = client.send(request, HttpResponse.BodyHandlers.ofString());
                System.out.println(response.statusCode() + " " + response.body());
            } catch (Exception e) {
                Throwable cause = e;
                while (cause.getCause() != null) cause = cause.getCause();
                System.out.println("ERROR " + e + " | " + cause);
            }
            System.out.flush();
        }
    }
}
